"""The `postwarden` command line (click)."""
