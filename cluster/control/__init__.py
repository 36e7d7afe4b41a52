"""The control plane: expert placement state and its controller, resize operations,
autoscaling, EPLB planning, expert load, worker totals and the admin API."""
