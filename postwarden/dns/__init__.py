"""DNS: the resolver built from `[dns]`, and the readiness report of `postwarden check dns`."""
