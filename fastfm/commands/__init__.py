"""Entry points, the top layer: ``python -m fastfm.train|sample|evaluate|export`` run the ``main`` of these
modules. Only this layer imports the export layer, lazily, when ``--engine`` is given."""
