"""One decision path for every consumer: the gateway's addons, What If (CLI and admin API),
``portcullis test``, the reload case gate and ``portcullis replay`` all call
``pipeline.authorize``; none of them calls the evaluator or rebuilds a stage of it.

    admission → identity → signals → evaluate → restrict → outcome        (pipeline.py)
    Authorization: the decision, what it used, and the action             (outcome.py)
    the sign-in record built from it (the consumer writes it)             (record.py)

Pages are rendered from the action by ``gateway.web.decision_pages``; nothing here builds a response.
"""
