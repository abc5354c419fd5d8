"""`python -m dataset.synthetic_sequence ...`: see dataset/synthetic_sequence/__init__.py."""
from dataset.synthetic_sequence.sequence import main

if __name__ == "__main__":
    main()
