from layersplice.cli.main import main

main()
