"""The training job: the loop (:mod:`.loop`), its saved state (:mod:`.train_state`), metrics
and progress (:mod:`.metrics`) and the layout planner's memory model (:mod:`.planner`)."""
