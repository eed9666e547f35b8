"""engine.planning: memory, memory_ops, memory_sim, planner, step_model, plan_bounds."""
