from layersplice.cli import main

main()
