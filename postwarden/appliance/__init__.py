"""The appliance (CLI only): rendered Postfix/Dovecot files, aliases, the mail queue, send-test."""
