"""`python -m dataset.synthetic_sequence.export_pair ...`: a frame pair of a sequence as a
DeepDeform-format pair; the code is in pair_export.py (a module the package imports, so that
running this one with -m does not find it imported already)."""
from dataset.synthetic_sequence.pair_export import main

if __name__ == "__main__":
    main()
