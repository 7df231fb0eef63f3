"""`python cli.py ...` is the same CLI as the `emo-edge` console script."""

from emo_edge.cli import main

if __name__ == "__main__":
    main()
