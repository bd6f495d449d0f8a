"""``python -m slimlm.kernels``: build the decode kernels now and print whether they are used."""

from slimlm.kernels import status

if __name__ == "__main__":
    print(f"slimlm decode kernels: {status()}")
