"""SQL the job store shares with things outside Python (the KEDA trigger counts the queue with it)."""

JOBS_TABLE = "training_jobs"

# Counts jobs waiting for a worker. The training worker's autoscaler runs exactly this
# statement against PostgreSQL, and the job store uses it for its queue-depth metric.
QUEUED_JOBS_COUNT_SQL = f"SELECT COUNT(*) FROM {JOBS_TABLE} WHERE state = 'QUEUED'"
