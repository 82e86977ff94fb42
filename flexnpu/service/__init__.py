"""FlexNPU as systemd services: the unit files (units.py), and `flexnpu service
install|uninstall|status` (install.py, cli.py)."""
