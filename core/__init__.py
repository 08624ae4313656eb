"""The code the BlockDrop scripts share, one concern per module; utils.py re-exports its public API."""
