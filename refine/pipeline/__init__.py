"""The fit of N ≥ 1 images: options, stages and schedule, prepare / run_stage / finish, results and ESDs."""
