"""The DKIM milter (a thin pymilter adapter over postwarden.dkim_*)."""
