"""sealstream: the service's settings, the wiring that builds its parts from them
(`wiring`), and the composition root above the API and the workers: the API process
(`server`), the server's commands (`commands`) and `upgrade-records` (`upgrade`)."""
