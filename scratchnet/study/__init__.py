"""The study: the measurements behind the README's results, one module each.

* ``grad_vs_T``: the input gradient's true size against the training T;
* ``attack_vs_T``: JSMA, FGSM and C&W success against T, masked and fixed;
* ``distillation``: temperature alone against defensive distillation, with intervals;
* ``saturation``: one digit, its softmax and its gradient maps, at T = 1, 20, 100;
* ``robustness``: robust accuracy against T under every attack, the worst case per
  image, the indicators of attack failure;
* ``common``: options, the model grid, result files shared by all of them.

Each has a ``main()`` that ``experiments/<script>.py`` runs.
"""
