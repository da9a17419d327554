"""Self-distillation data (`distill`), head training (`train`) and tau evaluation (`eval-tau`)."""
