"""snapshot package."""
