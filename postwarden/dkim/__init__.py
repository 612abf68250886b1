"""DKIM: keys, signing and verification (milterd and `postwarden dkim`)."""
