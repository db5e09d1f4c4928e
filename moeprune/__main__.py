"""`python -m moeprune ...` is the `moeprune` command."""

from moeprune.cli import main

if __name__ == "__main__":
    main()
