"""The watcher: turns submissions in object storage into Snakemake runs on the cluster.

    loop.py      the main loop (Settings, Watcher): queue, claims, isolation, start-up probe
    job.py       one submission from its lease to its final status
    lease.py     claim, renew, stale, fence, conditional release
    token.py     GitLab CI ID token verification (JWKS)
    checkout.py  fetch, ancestry, the run's own checkout, the config Snakemake runs (JSON)
    runner.py    the Snakemake child: allow-listed environment, operator's profiles, deadline, stop
    publish.py   check the prepared results commit, push DVC objects and the commit
    status.py    the status document, shared with geofm/cli/wait.py

The systemd unit `geofm-watcher.service` beside this file runs it as a service.
"""
