"""snapshot package: KV state blobs off the context: host copies (host), files (fileformat), the tiered store."""
