"""The command line: the `layersplice` group (main.py), the options the commands
share and how they resolve into sources (options.py), one module per family of
commands, and the tables they print (display.py).

Nothing outside this package imports it; `distill`, which needs torch, is loaded
from layersplice/distill/command.py only when it is called.
"""
