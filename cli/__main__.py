"""`python -m cli`: the `postwarden` console script, as the service supervisor spawns it."""

from cli.main import main

main()
