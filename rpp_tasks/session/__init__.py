"""One session's life: its work folder, the stage table, the frame runner and the lifecycle
shared by ``rpp reduce`` and the DAG."""
