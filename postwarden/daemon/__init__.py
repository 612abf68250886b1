"""What policyd and milterd share at run time: socket files, log line format, supervision."""
