"""snapshot package: live snapshots (base), host copies (host), files (fileformat), and the tiered store."""
