"""Control: the controller that turns the observer's snapshots into gate settings, and its
policies (pure functions of a snapshot, their own state and their configuration)."""
