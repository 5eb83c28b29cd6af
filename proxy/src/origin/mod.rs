pub mod export_tree;
pub mod file_server;
pub mod root_watch;
