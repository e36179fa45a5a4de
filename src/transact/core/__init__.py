"""The pruning pipeline: calibrate (statistics of the transitional activations) -> score (a metric) ->
select (a PrunePlan) -> correct (optional weight refits) -> slice (surgery). ``step`` joins them."""
