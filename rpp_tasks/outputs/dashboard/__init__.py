"""The observers' dashboard (issue 15): search every observation, look at it, validate or withdraw
it, download it. Pure library; ``plugins/rpp_reports.py`` wires it into the Airflow UI.

* `roles` -- what a logged-in user may do (viewer / observer / admin), from the auth manager;
* `store` -- the results database side: the frame search index, decisions, ObsCore sync;
* `search` -- search parameters, the query over every observatory's index, CSV/VOTable export;
* `files` -- product paths that may be served, previews, catalogue formats, progress;
* `pages` -- the HTML pages;
* `moc` -- coverage maps (HEALPix MOC) per session and observatory.

Nothing here imports Airflow or FastAPI.
"""
