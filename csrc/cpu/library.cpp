// The operators of the C++ CPU kernels, torch.ops.fastseq_cpp.*: one schema per kernel entry point, with CPU
// implementations in rnn_cells.cpp and rnn_layers.cpp (TORCH_LIBRARY_IMPL(fastseq_cpp, CPU)) and fake (meta)
// implementations in fastseq/cpp_kernels.py. They are the "cpp" backend's launchers: no autograd of their own
// (the fastseq::* operators that call them carry it). Results a launcher returns as None travel as empty
// tensors; fastseq/cpp_kernels.py turns them back into None.
//
// Shapes and layouts are those of the Triton launchers (kernels/rnn_cell.py, kernels/rnn_seq.py): G gates of
// H units (LSTM 4, GRU 3, RNN 1), Hout = P with an LSTM projection else H, D directions.

#include <torch/library.h>

TORCH_LIBRARY(fastseq_cpp, m) {
  // One cell step. Returns h' (c') in the input dtype and the float32 workspace (B, k·H) when `save`, else an
  // empty tensor: LSTM k = 5 (a_i, a_f, a_g, a_o, c'), GRU k = 4 (a_r, a_z, a_n, W_hn·h + b_hn), RNN k = 1 (a).
  m.def("lstm_cell_fwd(Tensor x, Tensor? h, Tensor? c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "bool save) -> (Tensor h_out, Tensor c_out, Tensor workspace)");
  m.def("gru_cell_fwd(Tensor x, Tensor? h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool save) "
        "-> (Tensor h_out, Tensor workspace)");
  m.def("rnn_cell_fwd(Tensor x, Tensor? h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool save, "
        "str nonlinearity) -> (Tensor h_out, Tensor workspace)");
  // Backward of one cell step from its workspace: the pre-activation gate gradients (GRU: of the input side and
  // of the hidden side) in the weights' dtype, dx (empty unless need_input_grad), dh and dc (empty without state).
  m.def("lstm_cell_bwd(Tensor grad_h, Tensor grad_c, Tensor workspace, Tensor? h, Tensor? c, Tensor w_ih, "
        "Tensor w_hh, bool need_input_grad) -> (Tensor dgates, Tensor dx, Tensor dh, Tensor dc)");
  m.def("gru_cell_bwd(Tensor grad_h, Tensor workspace, Tensor? h, Tensor w_ih, Tensor w_hh, bool need_input_grad) "
        "-> (Tensor dgates_x, Tensor dgates_h, Tensor dx, Tensor dh)");
  m.def("rnn_cell_bwd(Tensor grad_h, Tensor workspace, bool has_state, Tensor w_ih, Tensor w_hh, "
        "bool need_input_grad, str nonlinearity) -> (Tensor dgates, Tensor dx, Tensor dh)");

  // The recurrence of one layer, D directions, padded (T, B, D·G) or packed (N, D·G) with batch_sizes (int64,
  // CPU). Returns out (…, D·Hout), the final states (D, B, ·) and the float32 workspace (D, rows, width) when
  // `save` (LSTM [a_i, a_f, a_g, a_o, c', c, m (with a projection), h]; GRU [a_r, a_z, a_n, hn, h]; RNN [a, h]).
  m.def("lstm_layer_fwd(Tensor gates_x, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
        "Tensor? batch_sizes, bool save) -> (Tensor out, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def("gru_layer_fwd(Tensor gates_x, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? batch_sizes, bool save) "
        "-> (Tensor out, Tensor h_n, Tensor workspace)");
  m.def("rnn_layer_fwd(Tensor gates_x, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? batch_sizes, bool save, "
        "str nonlinearity) -> (Tensor out, Tensor h_n, Tensor workspace)");
  // Backward of one layer from its workspace: the gradient of gates_x (GRU: and of the hidden-side
  // pre-activations), of h0 and c0, and for an LSTM with a projection the float32 (D, rows, P) total gradient
  // of every step's output (empty without one).
  m.def("lstm_layer_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor workspace, Tensor w_hh, "
        "Tensor? w_hr, Tensor? batch_sizes) -> (Tensor dgates, Tensor dh0, Tensor dc0, Tensor dh_total)");
  m.def("gru_layer_bwd(Tensor grad_out, Tensor grad_hn, Tensor workspace, Tensor w_hh, Tensor? batch_sizes) "
        "-> (Tensor dgates_x, Tensor dgates_h, Tensor dh0)");
  m.def("rnn_layer_bwd(Tensor grad_out, Tensor grad_hn, Tensor workspace, Tensor w_hh, Tensor? batch_sizes, "
        "str nonlinearity) -> (Tensor dgates, Tensor dh0)");
}
