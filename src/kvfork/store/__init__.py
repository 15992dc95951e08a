"""snapshot package: KV state blobs off the context: host copies (host), files (fileformat), the tiered store
(RAM, disk folder, and a shared fsspec tier every replica reads)."""
