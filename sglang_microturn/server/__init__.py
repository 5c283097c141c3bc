"""Code that runs inside SGLang's processes: the plugin entry point, the /microturn HTTP API and its session
registry, the SGLang model class, the aligned attention backend, MoE dispatch, the scheduler's cohort
prefill, real-time admission, deadlines and warm-up, the stall log."""
