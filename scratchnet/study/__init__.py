"""The study: the measurements behind the README's results, one module each.

* ``grad_vs_T``: the input gradient's true size against the training T;
* ``attack_vs_T``: JSMA, FGSM and C&W success against T, masked and fixed;
* ``distillation``: temperature alone against defensive distillation, with intervals;
* ``saturation``: one digit, its softmax and its gradient maps, at T = 1, 20, 100;
* ``common``: options, the model grid, result files shared by all four.

Each has a ``main()`` that ``experiments/<script>.py`` runs.
"""
