"""`python -m dataset.synthetic ...`: see dataset/synthetic/__init__.py."""
from dataset.synthetic.splits import main

if __name__ == "__main__":
    main()
