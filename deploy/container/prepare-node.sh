#!/bin/sh
# The DaemonSet's init container (deploy/kubernetes/daemonset.yaml): what systemd's
# RuntimeDirectory= does for the units, and the shim libraries put where serving pods mount
# them from. Runs as root with CAP_CHOWN alone; every step is idempotent.
#
#   FLEXNPU_RUNTIME_DIR  the node's runtime dir, mounted from the host (/run/flexnpu)
#   FLEXNPU_HOST_LIB     the node's library dir, mounted from the host (/var/lib/flexnpu/lib)
#   FLEXNPU_UID/GID      the numbers the pod runs as (node-ids.yaml); the host's `flexnpu`
#                        user and group (its /etc/passwd and /etc/group are mounted) must match
#   FLEXNPU_PYTHON       the interpreter of the installed package (default /opt/flexnpu/bin/python)
set -eu

die() { echo "flexnpu-prepare-node: $*" >&2; exit 1; }

rd=${FLEXNPU_RUNTIME_DIR:?}
lib=${FLEXNPU_HOST_LIB:?}
uid=${FLEXNPU_UID:?}
gid=${FLEXNPU_GID:?}
py=${FLEXNPU_PYTHON:-/opt/flexnpu/bin/python}

# The daemons resolve `flexnpu` by name and serving pods join the group by number: one number.
hgid=$(getent group flexnpu | cut -d: -f3) \
    || die "the node has no flexnpu group; create it: groupadd --system --gid $gid flexnpu"
huid=$(getent passwd flexnpu | cut -d: -f3) \
    || die "the node has no flexnpu user; create it: useradd --system --uid $uid --gid flexnpu --no-create-home --shell /usr/sbin/nologin flexnpu"
[ "$hgid" = "$gid" ] || die "the node's flexnpu group is gid $hgid, the pod runs with gid $gid: set gid: \"$hgid\" in node-ids.yaml, or give the group gid $gid on every node"
[ "$huid" = "$uid" ] || die "the node's flexnpu user is uid $huid, the pod runs as uid $uid: set uid: \"$huid\" in node-ids.yaml, or give the user uid $uid on every node"

# Owned by the service user, 0755 (paths.RUNTIME_DIR_MODE), as RuntimeDirectory= makes it. The
# mode is set while root still owns it: after the chown only its owner may change it.
[ "$(stat -c %u "$rd")" != 0 ] || chmod 0755 "$rd"
[ "$(stat -c %u:%g "$rd")" = "$uid:$gid" ] || chown "$uid:$gid" "$rd"
[ "$(stat -c %a "$rd")" = 755 ] || die "$rd has mode $(stat -c %a "$rd"), not 0755; chmod 0755 $rd on the node"

# Each library is replaced by a rename, never rewritten in place: a serving process that
# maps the old file keeps it (writing into a mapped library crashes its users).
native=$("$py" -c 'from flexnpu import paths; print(paths.native_lib_dir())')
n=0
for f in "$native"/*.so; do
    name=${f##*/}
    if ! cmp -s "$f" "$lib/$name"; then
        cp "$f" "$lib/.$name.new"
        chmod 0644 "$lib/.$name.new"
        mv -f "$lib/.$name.new" "$lib/$name"
        n=$((n + 1))
    fi
done
echo "flexnpu-prepare-node: runtime dir $rd owned by $uid:$gid; $n libraries updated in $lib"
