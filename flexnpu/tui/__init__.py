"""`flexnpu top`: a live view of every device, process, gate and controller decision.

Split as nvitop is: `model` samples (it alone owns sockets, in its own thread) and hands
out immutable `Frame`s; `view` turns a Frame into rich renderables and never does I/O;
`cli` is the Typer command that runs the live screen, `--once` and `--json`.
"""
