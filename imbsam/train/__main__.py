from imbsam.train import main

main()
