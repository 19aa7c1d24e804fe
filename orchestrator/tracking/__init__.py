"""MLflow: `runs` (runs by id, searches, UI links, closing on exit) and `server` (the team's
PostgreSQL + basic-auth tracking server)."""
