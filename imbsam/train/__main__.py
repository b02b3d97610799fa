from imbsam.train import main
from imbsam.train.distributed import from_environment, leave_the_process

main()
leave_the_process(from_environment())  # a rank of torchrun: see there why
