"""`python -m qwendoctor`: the CLI; also the module torchrun starts for each rank of `generate --gpus N`."""

from qwendoctor.cli import main

main()
