from loralab.figures import main

main()
