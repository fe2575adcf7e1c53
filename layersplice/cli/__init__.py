"""The command line: the `layersplice` group (main.py), the options the commands
share and how they resolve into sources (options.py), one module per family of
commands, and the tables they print (display.py).

Nothing below the command line imports it. `distill` and `tokenize`, which need
torch, are loaded from layersplice/distill/command.py and tokenize_command.py
only when called; being command-line modules, they take their shared options
from options.py.
"""
