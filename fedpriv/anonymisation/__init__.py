"""Anonymisation of tabular records before federated training (k-anonymity, l-diversity).

``hierarchy``: the configuration's hierarchies, checks, labels and trained values (pure);
``kanon``: one table in, released rows and their report out (anjana's search, pycanon's checks);
``rows``: a client's own rows, anonymised, as it trains on them; ``report``: every client's
figures for the operator, and privacy.json's section. Import the submodules themselves.
"""
