from imbsam.anomaly import main

main()
