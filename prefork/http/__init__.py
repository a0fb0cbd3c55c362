"""HTTP/1.1 protocol code: bytes in, requests out; response framing. No I/O."""
