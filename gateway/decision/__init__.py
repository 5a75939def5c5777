"""One decision path for every consumer: the gateway's addons, What If (CLI and admin API),
``portcullis test``, the reload case gate and ``portcullis replay`` all call
``pipeline.authorize``; none of them calls the evaluator or rebuilds a stage of it.

    admission → identity → signals → evaluate → restrict → outcome        (pipeline.py)
    Authorization: the decision, what it used, and the action             (outcome.py)
    the decision's log record built from it (the consumer writes it)      (record.py)
    the rules a decision reads, swapped whole on reload                   (rules.py)
    the gateway's identity and signal sources                             (sources.py)
    the gateway's use of it: count, record, render, sign in (AccessService) (service.py)
    the decision log: JSON lines, rotation, pseudonyms, lookup            (log.py)

Pages are rendered from the action by ``gateway.web.decision_pages``; nothing here builds a response.
"""
