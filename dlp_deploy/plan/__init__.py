"""`dlp-deploy plan`: the fastest deployment of a model on this CPU within a quality budget (issue 27).

select.py holds the decisions (budget filter, Pareto front, tie rule, time-budget planner) as pure functions;
candidates.py the search space; stages.py the wiring of the three stages; render.py what the plan writes."""
