"""The paper's theory: the γ-exponent calculus of one LoRA module (`calculus`) and the
teacher-student toy that measures it (`toy`, with `toy_report` and `toy_figures`)."""
