"""One module per method: its config dataclass and its trainer."""
